"""Protocol tests: SMTP sequencing driven through the conversation in-process, no sockets."""
