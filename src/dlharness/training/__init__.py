"""The harness's training run: one typed config, the components it builds, `train(cfg)`, the
command line, resume, and the run it opens and ends."""
