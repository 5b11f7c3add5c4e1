"""The command-line applications (``hsam evaluate / predict / demo / info / train /
prepare``) as thin layers over the library; :mod:`hsam.apps.cli` is the entry point."""
