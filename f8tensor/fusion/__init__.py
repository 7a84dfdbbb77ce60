"""fuse_model_ops: run a model's own norm, gate and RoPE code as the fused ops, where it can prove what
that code computes (fuse.py is the entry point; norm_swap.py, gate_proof.py and rope_proof.py the
three fusions; fused_class.py the subclass a proven module gets; python_versions.py the Pythons the
proofs were checked on)."""
