"""Services: lifecycle of ports, timers and files."""
