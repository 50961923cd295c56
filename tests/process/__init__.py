"""Process tests: the real gate as a child process, real SMTP clients, a real downstream."""
