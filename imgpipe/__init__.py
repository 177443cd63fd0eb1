"""imgpipe: the command line over the pipeline's components, pipelines and serving."""
