"""Pure scheduling core: types, lifecycle, policies. No I/O; driven by runtime/ and sim/.

Public surface (everything else is internal bookkeeping):

- `types`: RequestState, RequestClass, InstanceRole, SpKind (string enums); RequestSpec,
  InstanceSpec (inputs); RequestView, InstanceView, ClassStats, ClusterView, AdmissionVerdict
  (read-only snapshots); `classify(prompt_tokens, threshold)`.
- `events`: what drivers feed to `Policy.observe` (RequestArrived, PrefillChunkDone,
  PrefillPaused, PrefillDone, KVTransferDone, TokensGenerated, RequestFinished,
  RequestCancelled, RequestFailed, InstanceUp, InstanceDown); the `Event` union.
- `actions`: what `Policy.schedule` returns in a frozen `Decision` (StartPrefill, Colocate,
  Pause, Resume, TransferKV, StartDecode, Cancel, Reject) and the data-plane semantics the
  drivers implement; `action_kind`, `action_to_dict`.
- `policy.Policy`: the protocol; `policies.registry.make_policy(name, config, rng)` and
  `policy_names()` build one.
- `config.SchedulerConfig` (every threshold, the paper's defaults) and `LongDecodeSharing`.
- `lifecycle`: the named transition rules; `errors`: ErrorCode and the domain errors;
  `accounting.check_fits`: the pure admission check.
"""
