"""Request and response bodies, one family per resource, separate from the ORM rows."""
