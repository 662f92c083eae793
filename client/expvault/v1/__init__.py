"""Generated code of the expvault wire contract (proto/expvault/v1); never edit."""
