//! The AWS adapters, each behind one of the engine's ports: [`data_api`] (SQL, Aurora through
//! the RDS Data API), [`ses`] (mail, SES v2), [`invoke`] (next hop, Lambda `Invoke`), and
//! [`secrets`] (the unsubscribe key from Secrets Manager, read once per sandbox). Clients
//! are built once per process (per Lambda sandbox) from the default credential chain; endpoints
//! follow the standard `AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_<SERVICE>` variables.

pub mod data_api;
pub mod invoke;
pub mod secrets;
pub mod ses;
