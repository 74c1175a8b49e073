"""Host confinement beyond the jailer: which LSMs are active, and AppArmor / SELinux policy
generated from a VM's configuration (spec: Future Enhancements, Phase 3)."""
