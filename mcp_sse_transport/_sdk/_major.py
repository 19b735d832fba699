"""Which major of the MCP SDK is installed, read from its distribution without importing it."""

from importlib.metadata import version

VERSION = version("mcp")
MAJOR = int(VERSION.split(".", 1)[0])
