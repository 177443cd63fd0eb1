"""The served model in use: each exported version's reference profile (``reference``), the
logged traffic and labelled feedback checked against it (``traffic``, with the drift tests of
``drift``), the page a person on call reads (``report``) and batch scoring of new images
(``scoring``).

May import every room before it and the wire formats of ``serving`` (the request log, tensors);
nothing imports it but commands and orchestrators.
"""
