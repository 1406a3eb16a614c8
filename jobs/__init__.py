"""The ``clipmaps`` command line and what it runs."""
