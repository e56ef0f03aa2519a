"""Performance harness: timings, memory, roofline."""
