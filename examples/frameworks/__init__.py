"""One runnable server per framework, each served by one line of this library (README: "Using it with")."""
