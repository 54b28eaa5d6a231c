"""HTTP and websocket routes (SPEC §4): thin handlers over the run manager, store and hub."""
