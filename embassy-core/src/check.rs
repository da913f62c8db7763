//! Active health checks: one checker per distinct endpoint and check, shared by the services
//! that use it.
