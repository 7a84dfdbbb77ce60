"""Float8 layers under torch.distributed: tensor parallelism (DTensor weights), FSDP2's float8
all-gather (Float8Config(fsdp_float8_all_gather=True)), and the float8 sequence-parallel all-gather
(sequence_parallel.Float8PrepareModuleInput, imported from its module: it imports DTensor). Without
the float8 switches fully_shard and parallelize_module work over converted layers as over nn.Linear,
gathering in high precision. docs/distributed.md says what moves in which dtype."""
