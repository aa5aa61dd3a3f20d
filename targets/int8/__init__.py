"""int8 in TVM: QDQ lowering to integer Relax, blocked dot-product layouts, fixed-point requantization."""
