"""The rule API and its machinery: rule, options, verdict, plugin loading, policies, runner."""
