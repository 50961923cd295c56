"""Per-key state machines (the model) and MachineRule, the rule base class that runs them."""
