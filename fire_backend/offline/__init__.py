"""What runs without a server: training and poisoning, BackdoorBench import, checkpoints, the offline FIRE
evaluation (CA, PA, ASR) and ``fire import model``."""
