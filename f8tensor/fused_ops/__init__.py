"""Fused model ops: a transformer's own elementwise code (RMSNorm, the SwiGLU gate, RoPE) in one pass
each way, handing the amax of what they write to the float8 layers that read it; and the loss
(cross_entropy), one pass over the logits each way without their fp32 copies."""
