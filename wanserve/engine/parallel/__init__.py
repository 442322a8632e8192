"""The parallel runtime: process groups and their timeouts, the layout, xfuser's runtime state,
sequence-parallel padding, the device, and the workarounds for xfuser's version."""
