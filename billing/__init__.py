"""hostmeter billing: catalog, conversion rules, invoices and reruns."""
