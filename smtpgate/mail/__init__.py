"""What a transaction carries: addresses, the message, session and transaction, replies."""
