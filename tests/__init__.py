"""The test suite, in tiers: unit, rules, protocol, process, postfix (see the README's Layout)."""
