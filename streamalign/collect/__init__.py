"""collect: fork-group rollouts from a policy, scored and written to a sharded replay buffer."""
