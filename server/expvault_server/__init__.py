"""expvault_server: the vault daemon (`expvault serve`) and the `expvault` command."""
