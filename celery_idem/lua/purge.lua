-- purge: delete a record and its steps (``celery idem purge``), if it still matches.
--
-- The operator chose the record from a scan; by the time this runs a delivery may have
-- changed it, so the state and task are checked again here, where nothing can change
-- them in between.
--
-- KEYS[1]  the record
-- KEYS[2]  its steps
-- ARGV[1]  the states to delete, each between commas (',done,failed,')
-- ARGV[2]  the task's name the record must carry ('' for any)
--
-- Returns 1 when deleted, 0 when left (another state or task, or already gone: a call
-- sent again after its reply was lost deletes nothing more).
local rec = redis.call('HMGET', KEYS[1], 'state', 'task')
if not rec[1] or not string.find(ARGV[1], ',' .. rec[1] .. ',', 1, true) then
  return 0
end
if ARGV[2] ~= '' and rec[2] ~= ARGV[2] then
  return 0
end
redis.call('DEL', KEYS[1], KEYS[2])
return 1
