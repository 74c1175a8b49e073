"""AppArmor profiles and SELinux policy modules generated from a VM's configuration
(spec: Future Enhancements, Phase 3). Which LSMs are active: :mod:`ironclaw_orchestrator.lsm`."""
