"""What ``imgpipe monitor`` reads from the request log (imgpipe.monitoring.traffic.read_traffic):
every request counted, a bounded uniform sample compared, and a corrupt file quarantined instead of
failing every later check."""

from __future__ import annotations

import numpy as np
from test_request_log import call, settings

from imgpipe.monitoring.traffic import TESTS, read_traffic
from serving.request_log import RequestLog, closed_logs, tfrecord_frame


def _log(directory, calls: int, first: int = 0) -> None:
    log = RequestLog(settings(directory, queue_bytes=1 << 30, max_file_bytes=1 << 18))
    for i in range(first, first + calls):
        assert log.offer("predict", *call(i))
    log.close()


def test_every_request_is_counted_and_a_bounded_uniform_sample_is_kept(tmp_path):
    _log(tmp_path, 3000)
    traffic = read_traffic(tmp_path, "cells", 3, max_requests=200, seed=1)
    assert traffic.requests == 3000 and len(traffic.encoded) == len(traffic.probabilities) == 200
    assert len(traffic.files) > 1 and not traffic.quarantined
    drawn = sorted(int(image[4:].split(b"\0")[0]) for image in traffic.encoded)  # b"png-<i>..."
    assert len(set(drawn)) == 200  # without replacement
    # uniform over the whole stream, not the first or last files: its quartiles near 750,
    # 1500 and 2250 (a sample of 200 puts them within about 110 of those)
    assert np.allclose(np.percentile(drawn, [25, 50, 75]), [750, 1500, 2250], atol=250), drawn
    assert read_traffic(tmp_path, "cells", 3, max_requests=200, seed=1).encoded == traffic.encoded
    other = read_traffic(tmp_path, "cells", 4)
    assert other.requests == 0 and other.other_versions == {"cells v3": 3000}
    assert TESTS == 3


def test_a_corrupt_file_is_read_up_to_its_bad_record_and_quarantined(tmp_path):
    _log(tmp_path, 3)
    (good,) = closed_logs(tmp_path)
    records = good.read_bytes()
    bad = tmp_path / "requests-20261206T000000-bad00000-000001.tfrecord"
    bad.write_bytes(records + tfrecord_frame(b"not a PredictionLog")[:-3])
    traffic = read_traffic(tmp_path, "cells", 3)
    assert traffic.requests == 6  # the good file's 3, and the bad one's 3 before its bad record
    relative = bad.name
    assert list(traffic.quarantined) == [relative], traffic.quarantined
    assert "truncated or corrupt TFRecord at byte" in traffic.quarantined[relative]
    again = read_traffic(tmp_path, "cells", 3, skip=traffic.files)  # the monitor's next check
    assert again.requests == 0 and not again.quarantined
