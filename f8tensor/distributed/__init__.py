"""Float8 layers under torch.distributed: tensor parallelism (DTensor weights), and FSDP2's float8
all-gather (Float8Config(fsdp_float8_all_gather=True)); without it fully_shard over converted layers
works as it does over nn.Linear, gathering the high-precision weights."""
