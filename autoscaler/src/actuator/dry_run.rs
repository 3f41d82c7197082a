//! Decide and report only: nothing is changed, and the count asked for is the decision itself.

use super::Scale;

/// The dry-run actuator.
pub struct DryRun;

impl Scale for DryRun {
    async fn current(&mut self) -> Result<Option<u32>, String> {
        Ok(None)
    }

    async fn set(&mut self, _replicas: u32) -> Result<(), String> {
        Ok(())
    }
}
