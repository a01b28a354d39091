"""edgectl: the operator CLI."""
