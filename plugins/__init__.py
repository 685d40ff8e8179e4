"""harness's built-in plugins, installed as ``harness_plugins`` and loaded through DEFAULT_PLUGINS."""
