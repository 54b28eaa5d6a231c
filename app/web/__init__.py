"""The browser dashboard: pages, htmx fragments and the files they load."""
