"""Self-supervised pretraining on the small set itself (METHODS.md B): DINO's head, loss, schedules, the multi-crop
backbone wrapper and the k-NN probe; the loop is engine/pretrain.py."""
