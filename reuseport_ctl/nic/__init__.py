"""NIC queues, IRQs and RSS as plain data (model), and the verdict on them
(verdict): pure Python, read by kernel/nic.py and shown by `reuseport-ctl nic`."""
