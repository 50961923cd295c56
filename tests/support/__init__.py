"""Test helpers: gate and Postfix child processes, capturing downstream, DNS server, raw client."""
