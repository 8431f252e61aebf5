"""What runs a step: the upstream model call (with stream reassembly), HTTP tools, the tool registry."""
