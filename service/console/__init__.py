"""The web console at /console: static pages that speak only the public REST API."""
