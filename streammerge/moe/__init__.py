"""Mixture-of-Experts assembly from dense experts (mergekit-moe 0.1.5 YAML): config, gates, outputs, plan, run."""
