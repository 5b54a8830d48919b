"""Networks (`nets`) and the LightningModule that trains any of them (`classifier`)."""
