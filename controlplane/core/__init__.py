"""Pure scheduling core: types, lifecycle, policies. No I/O; driven by runtime/ and sim/."""
