"""smallvit's engine: config, models, tasks, the training loops, evaluation."""
__version__ = "0.1.0"   # the package version, also setup.py's and `smallvit --version`'s
