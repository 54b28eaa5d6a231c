"""gradwatch's server side and command line."""
