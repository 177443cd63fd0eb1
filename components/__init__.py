"""Pipeline steps. Each step is a module with a plain ``run(...)`` over paths and a typed config;
the CLI (``imgpipe``), the DVC stages and the Kubeflow components are thin adapters over it."""
