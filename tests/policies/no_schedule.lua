-- Returns a table without schedule().
return { init = function() end }
