-- release: give a lease back without an outcome, so the next delivery can run.
--
-- KEYS[1]  the record
-- KEYS[2]  its steps (kept as long as the record: the next run replays them)
-- ARGV[1]  'token' to match the caller's fencing token, 'holder' to match a task id,
--          or 'run' to match a task id and the id of its run (used by the worker's
--          main process to free the key of a run it saw die)
-- ARGV[2]  the token or task id
-- ARGV[3]  how long to keep the freed record, ms (it keeps the fencing token and the
--          fence, so the next run's are higher)
-- ARGV[4]  the run id ('run' only)
--
-- Returns 1 when released, 0 when the caller did not hold the lease.
local key = KEYS[1]
local rec = redis.call('HMGET', key, 'state', 'token', 'holder', 'run')
if rec[1] ~= 'running' then
  return 0
end
if ARGV[1] == 'token' then
  if rec[2] ~= ARGV[2] then return 0 end
elseif rec[3] ~= ARGV[2] or (ARGV[1] == 'run' and rec[4] ~= ARGV[4]) then
  return 0
end
redis.call('HSET', key, 'state', 'free')
redis.call('HDEL', key, 'holder', 'expires', 'run')
redis.call('PEXPIRE', key, tonumber(ARGV[3]))
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[3]))
return 1
