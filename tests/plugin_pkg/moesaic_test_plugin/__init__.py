"""A moesaic plugin package used by the tests; importing the package itself registers nothing."""
