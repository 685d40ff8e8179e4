"""Package discovery for setuptools; the metadata and dependencies live in setup.cfg.

setup.cfg cannot both find packages and add one from another folder, and harness needs both: every
subpackage of ``harness`` (found, so a new one can never be left out of a wheel again) and the built-in
plugins, which live in the top-level ``plugins/`` folder and install as ``harness_plugins`` so they never
shadow a user's own module called ``plugins``.
"""

from setuptools import find_packages, setup

PLUGINS_FOLDER, PLUGINS_PACKAGE = "plugins", "harness_plugins"

plugin_packages = [PLUGINS_PACKAGE + name[len(PLUGINS_FOLDER):]
                   for name in find_packages(include=[PLUGINS_FOLDER, PLUGINS_FOLDER + ".*"])]

setup(
    packages=find_packages(include=["harness", "harness.*"]) + plugin_packages,
    package_dir={PLUGINS_PACKAGE: PLUGINS_FOLDER},
)
