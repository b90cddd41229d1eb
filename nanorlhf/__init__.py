"""nanoRLHF's shared plumbing: the rollout engine, the LoRA policy, log-probs, rewards, data, tracking and
checkpoints. The algorithm math (advantages, baselines, KL, losses) lives in the scripts, not here."""
