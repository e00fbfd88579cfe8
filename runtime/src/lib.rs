//! Executes ngpt launch plans. Filled by the plan issue; depends on `ngpt-schemas` only.
